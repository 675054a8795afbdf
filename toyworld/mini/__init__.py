"""FlexIP-mini: a miniature text-to-image model and FlexIP adapters trained on the toy world, on CPU.

`python -m toyworld.mini.build` trains every stage with fixed seeds and writes assets/mini/ and the `mini`
profile; `python -m toyworld.mini.curve` plots the measured identity/prompt trade-off across the gate.
"""
