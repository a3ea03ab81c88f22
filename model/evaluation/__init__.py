"""Evaluation: the report on synthetic pairs, real image pairs (HPatches / Oxford sequences) and their report."""
