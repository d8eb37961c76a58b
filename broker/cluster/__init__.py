"""
Cluster mode: several broker nodes (processes or machines) behaving as one,
through Redis.
"""
