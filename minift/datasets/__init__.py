"""The bundled clinical data sets (installed as minift.datasets): <task>/{sft,dpo,test}.jsonl."""
