"""Protocol codecs with no I/O (bytes in, bytes or events out); see each module's overview."""
