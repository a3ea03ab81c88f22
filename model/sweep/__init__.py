"""The experiment sweep of model.experiments: what it runs (scales, variants) and its report."""
