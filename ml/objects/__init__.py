"""Objects and their attributes, for search at the object level ("this, but in blue").

``instances`` cuts a project's per-tag masks into objects and reads their attributes from the
tags whose masks cover them (numpy and OpenCV); ``attributes`` learns attribute-specific
embeddings and a manipulation network from them (torch, jobs only); ``index`` answers queries
with what the learning wrote (numpy: the web process never imports torch).
"""
