"""What every command shares: flag handling and one-line errors, Beam runner set-up."""
