"""`make bench`: modeld measured against llama.cpp's own server and llama-cpp-python."""
