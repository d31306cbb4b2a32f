"""`lmrc show`: one offline HTML page of documents, entities and relations, per method, against gold."""
