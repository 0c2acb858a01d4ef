"""One small app per peer (``load_test/peers.py`` starts them): LitServe, BentoML, Ray Serve, each calling the shared
``load_test.peers.Pipeline`` with its settings from the environment."""
