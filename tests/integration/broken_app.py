"""An app module that fails while importing (for the operator-error tests)."""

raise RuntimeError("this module is broken on purpose")
