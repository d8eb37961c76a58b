"""
The Azure Web PubSub face: client WebSockets on /client/hubs/{hub} (and, in
later issues, the REST data-plane API and CloudEvents upstreams).
"""
