"""Everything that is not the method: file formats, text sources and the token cache, the PG19 download, the
memory model, the run folder, CLI plumbing and atomic writes, the offline demo."""
