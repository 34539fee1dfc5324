"""Pruning (unstructured, structured, one-shot LLM). Not implemented yet: its `prune` stage and
`PruningCallback` register here."""
