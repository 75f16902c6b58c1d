"""What an operator reads: Prometheus metrics (``metrics``), logging set-up
(``logs``) and rate-limited noise logs for bad input (``noise``)."""
