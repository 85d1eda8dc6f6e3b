"""Performance measurements (not tests): each script prints ratios measured side by side in one run."""
