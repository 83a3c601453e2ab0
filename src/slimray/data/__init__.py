"""The data layer: the user's own files read with Ray Data (``slimray.data.files``: image folders, Parquet, NPZ; split,
checked in one streaming pass, the teacher's outputs as a batch-inference job) and the row counts of text files
(``slimray.data.count``). The built-in datasets a family ships (the classifier's digits and MNIST) live in the family's
folder (``slimray.families.classifier.datasets``): they need no Ray.
"""
