"""The homography estimators, one place: estimate (what a method returns, plausibility), classical (identity,
ORB, SIFT, ECC), learned (the network), refine (ECC from any start), registry (names and their grammar:
X+ecc, X_or_Y, auto), parallel (per-pair work over a pool), photos (whole photos within stated bounds)."""
