"""
Admin HTTP endpoints: /healthz, /stats, /metrics.
"""
