"""Small shared helpers with one home each (file safety: `files`)."""
