"""Tools beside the server: the tutorial's client, the benchmark, the demo."""
