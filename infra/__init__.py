"""Everything that is not the method: file formats, text sources and the token cache, the PG19 download, the
memory model, the run folder, CLI plumbing and atomic writes, the offline demo."""
from pathlib import Path

# 42 public-domain Shakespeare plays from Project Gutenberg in PG19's layout (36 train, 3 validation, 3 test;
# metadata.csv names each source): the tests' tokenizer and the benchmarks' corpus, shipped so that a fresh
# clone needs nothing beside it.
PG19_MINI = Path(__file__).resolve().parent / "pg19-mini"
