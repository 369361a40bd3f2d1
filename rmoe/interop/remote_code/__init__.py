"""Templates that ``rmoe export`` copies into custom-code export directories (never imported from here:
``modeling_rmoe.py`` imports the bundled ``rmoe_*.py`` copies that sit next to it in an export)."""
