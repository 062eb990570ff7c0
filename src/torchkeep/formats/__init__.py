"""On-disk formats behind one protocol (``_base.Format``) and one byte-sniffing registry."""
