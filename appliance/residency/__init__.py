"""What is loaded, and the memory it takes."""
