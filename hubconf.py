"""torch.hub entry points: ``torch.hub.load(repo_dir, 'scalable_vit_small', source='local')`` (or ``'owner/repo'``
from GitHub), as timm's ``hubconf.py``; any ``timm.create_model`` argument passes through."""
dependencies = ['torch', 'timm']

from scalablevit.model import scalable_vit_base, scalable_vit_large, scalable_vit_small  # noqa: E402,F401
