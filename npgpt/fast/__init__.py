"""The fast paths: faster implementations of the textbook's ops, registered beside them."""
