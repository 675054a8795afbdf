"""FlexIP-mini: a miniature text-to-image model and FlexIP adapters trained on the toy world, on CPU.

`python -m flexip_core.mini.build` trains every stage with fixed seeds and writes assets/mini/ and the `mini`
profile; `python -m flexip_core.mini.curve` plots the measured identity/prompt trade-off across the gate.
"""
