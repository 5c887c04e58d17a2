"""Face super-resolution (SR3 on ORL faces, 16x16 to 64x64 grey): data, metrics, model and study."""
