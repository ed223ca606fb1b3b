"""Small developer tools that are not part of the deployed product."""
