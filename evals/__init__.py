"""Evaluation: lm-eval on a model in memory (`runner`, cached by weights and settings) and the offline
benchmark suite it runs by default (task YAML in `tasks/`, their data builders `knowledge`, `ifeval_prompts`,
`prose`, and the NLTK data IFEval needs, built offline by `nltk_offline`)."""
