"""Test harnesses: ``sim`` drives two protocol cores and their pools in
memory, with no sockets or threads. Nothing in the library imports them."""
