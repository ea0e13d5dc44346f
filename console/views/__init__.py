"""Console pages: thin adapters that parse input, call one service or selector, and render."""
