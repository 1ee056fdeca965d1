"""diffusion_jax: Imagen, GLIDE and unCLIP text-to-image diffusion cascades in JAX/Flax."""
from setuptools import find_packages, setup

# jax/jaxlib/libtpu are pinned together: the AOT tool compiles for TPU with the libtpu that
# matches this jax.
JAX_VERSION = '0.10.2'

setup(
    name='diffusion_jax',
    version='0.1.0',
    description='Train, sample and evaluate Imagen, GLIDE and unCLIP cascades in JAX/Flax.',
    license='Apache-2.0',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['diffusion_jax', 'diffusion_jax.*', 'configs', 'projects',
                                    'projects.*']),
    python_requires='>=3.10',
    install_requires=[
        f'jax=={JAX_VERSION}',
        f'jaxlib=={JAX_VERSION}',
        'flax==0.12.8',
        'optax==0.2.8',
        'orbax-checkpoint==0.12.8',
        'grain==0.2.18',
        'array-record==0.8.6',
        'tensorflow-datasets==4.9.10',
        # clu's metric writers and TFDS' builders need TensorFlow; the CPU build suffices.
        'tensorflow-cpu==2.21.0',
        'tensorboard==2.21.0',
        'clu==0.0.12',
        'ml-collections==1.1.0',
        'absl-py',
        'numpy>=2',
        'scipy',
        'pillow',
        'transformers==5.24.0',
        'tokenizers',
        'sentencepiece',
        'importlib_resources',  # imported by TFDS when preparing datasets
        'safetensors',
    ],
    extras_require={
        'test': [
            'pytest',
            'pytest-xdist',  # the suite runs on two workers, one test file each at a time
            'torch==2.13.0',
            # reference implementations of the released diffusers-layout pipelines (parity)
            'diffusers==0.42.1',
        ],
        'tpu': [f'jax[tpu]=={JAX_VERSION}'],
    },
)
