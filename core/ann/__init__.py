"""faiss: choosing, building, tuning and searching the ANN index (the only room that speaks faiss' names)."""
