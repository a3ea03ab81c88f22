"""The homography estimators: identity, the classical methods (ORB, SIFT, ECC), the network and their chains."""
