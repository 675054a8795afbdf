"""FlexIP Studio's user interface: a Gradio Blocks app over a small engine interface (see ui.engine)."""
