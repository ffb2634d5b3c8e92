"""Request tracing, the HTTP/ASGI side: one traced exchange per request, IDs on the wire, SSE and WebSocket."""
