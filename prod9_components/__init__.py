"""prod9_components: the shared package behind every prod9 MONAI bundle."""
