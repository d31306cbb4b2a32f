"""Stage 2: an LLM classifies the relations of entity pairs.

`prompts` renders the templates in `prompts/`, `parse` reads `(head| relation| tail)` lines back from the model's
answer, and `align` maps them onto the document's entities and the relation set (the scoring side of LMRC).
"""
