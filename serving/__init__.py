"""Serving stage: what runs in production, beside ``serve.sh`` and ``config.properties``.

``instance`` (one running stack: home, addresses, processes, start and stop), ``torchserve`` (the client of its
management API), ``front_door`` (nginx in front of TorchServe, rendered from ``nginx.conf``, and the A/B splits),
``health`` (the readiness and liveness checker), ``v2`` (the Open Inference Protocol gateway) and ``logs`` (every
log's size cap and rotation).
"""
