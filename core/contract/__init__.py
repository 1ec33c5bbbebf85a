"""The model contract: what a user's two-tower model declares (spec), how it is packaged and verified
(package), how data is checked against it (encode), and the loaded towers every job and endpoint runs
(towers)."""
