"""Text-to-speech: audio features, a Festival-synthesised corpus, LJSpeech loading."""
