"""FlexIP Studio benchmarks: what the slider costs, as ratios of things measured side by side (`python -m benchmarks`)."""
