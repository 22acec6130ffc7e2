"""The client side of attnserve, apart from the server: the `attnserve translate` command (translate.py), its
attention plot (plot.py), and client-side load balancing over replicas (balancing.py)."""
