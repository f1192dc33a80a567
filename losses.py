"""The objectives: small pure functions of D's scores (as stylegan2-ada's training/loss.py).

Scores are D's raw outputs, one per image, (B,). Each D loss returns its real and fake parts
(logged apart); the trainer adds them and, for wgan-gp, lambda_gp x the gradient penalty.
"""
import torch
import torch.nn.functional as F


def d_hinge(real_out, fake_out):
    """The paper's D loss: mean(relu(1 - D(x))), mean(relu(1 + D(G(z))))."""
    return F.relu(1.0 - real_out).mean(), F.relu(1.0 + fake_out).mean()


def d_wasserstein(real_out, fake_out):
    """WGAN's critic loss: -mean(D(x)), mean(D(G(z)))."""
    return -real_out.mean(), fake_out.mean()


def g_adversarial(fake_out):
    """The generator loss of both hinge and wgan-gp: -mean(D(G(z)))."""
    return -fake_out.mean()


def gradient_penalty(D, real, fake, alpha=None):
    """WGAN-GP: (||grad_x D(x)||_2 - 1)^2 at random points between real and fake images;
    alpha (B, 1, 1, 1) in [0, 1] says where, drawn here when not given."""
    if alpha is None:
        alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
    x = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(D(x).sum(), x, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


D_LOSSES = {"hinge": d_hinge, "wgan-gp": d_wasserstein}  # by --adv_loss
