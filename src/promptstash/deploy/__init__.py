"""Running several replicas: HAProxy affinity routing (haproxy.py) and a one-machine deployment of replicas,
HAProxy and Redis for trying it (local.py, `promptstash route`). README "Running several replicas"."""
