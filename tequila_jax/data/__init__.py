"""Text corpora -> tokenized shards -> packed, shuffled, sharded grain batches.

- `sources`: source specs (files, JSONL, parquet, ArrayRecord, `hf:`,
  `asset:NAME`) -> documents, and what identifies their bytes;
- `corpus`: documents -> a tokenized corpus (train/held-out streams),
  cached by that identity;
- `pipeline`: a corpus -> packed windows -> grain batches;
- `corpora`: the offline text corpora (`asset:NAME`).

This module only re-exports their public names.
"""

from tequila_jax.data.corpus import (CORPUS_FORMAT, META, SPLITS,
                                     changed_inputs, corpus_id, corpus_key,
                                     eval_sources, held_out_documents,
                                     prepare, prepare_for_config, read_meta)
from tequila_jax.data.pipeline import PackedWindows, eval_batches, train_iterator
from tequila_jax.data.sources import (ERRORS, DataError, content_hash,
                                      fingerprint, iter_documents, provenance,
                                      source_name)

__all__ = [
    "CORPUS_FORMAT", "DataError", "ERRORS", "META", "PackedWindows", "SPLITS",
    "changed_inputs", "content_hash", "corpus_id", "corpus_key",
    "eval_batches", "eval_sources", "fingerprint", "held_out_documents",
    "iter_documents", "prepare", "prepare_for_config", "provenance",
    "read_meta", "source_name", "train_iterator"]
