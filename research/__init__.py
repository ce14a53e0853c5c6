"""The lab: hf-lorafa's experiments on its public API, their results and write-ups (README.md). Not shipped."""
