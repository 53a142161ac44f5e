"""Coverage-guided fuzzing of the codec (docs/fuzzing.md)."""
