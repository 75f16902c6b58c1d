"""The I/O runtime the endpoints run on: the event loop (``loop``), same-host
control lanes (``lane``), host identity (``host``) and message
authentication (``auth``). Private: no name here is public API."""
