"""One module per command's stage: which format package does the work, and where its output goes."""
