"""Input construction: prompt strings, images, processor, collation, batching and readers."""
