"""Plain text in: read text files, cut them into sentences and tokens, find and group entity mentions, and build
DocRED documents the relation pipeline can take (issue 16). spaCy (the `text` extra) does the tokenising."""
