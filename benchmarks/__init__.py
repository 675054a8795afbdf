"""FlexIP Studio benchmarks: what the slider costs, as ratios of things measured side by side.

Run them with `python -m benchmarks`."""
